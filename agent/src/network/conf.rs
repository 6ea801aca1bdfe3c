//! CNI network configuration: loading a network by name from the conf dir and writing the
//! agent's default network when it has no file yet.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::AgentError;

/// The `cniVersion` of the default network. Debian's plugins (1.1.x) speak 0.1.0 to 1.0.0.
pub const DEFAULT_CNI_VERSION: &str = "1.0.0";

/// File extensions the loader reads, as libcni does.
const EXTENSIONS: [&str; 3] = ["conflist", "conf", "json"];

/// A network: a named, ordered list of plugin configurations.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfList {
    /// The network's name.
    pub name: String,
    /// The `cniVersion` every plugin is called with.
    pub cni_version: String,
    /// `disableCheck`: CHECK is skipped (reported healthy) when set.
    pub disable_check: bool,
    /// Plugin configurations, in ADD order; each has a string `type`.
    pub plugins: Vec<Value>,
}

impl NetworkConfList {
    /// Parses a conflist (`{"name", "cniVersion", "plugins": [...]}`) or a single plugin
    /// configuration (`{"name", "cniVersion", "type", ...}`), which becomes a one-plugin list.
    pub fn parse(v: &Value) -> Result<Self, String> {
        let obj = v
            .as_object()
            .ok_or_else(|| "network configuration is not a JSON object".to_string())?;
        let name = obj
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| "network configuration has no name".to_string())?
            .to_string();
        let cni_version = obj
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or("0.1.0")
            .to_string();
        let disable_check = obj
            .get("disableCheck")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let plugins = match obj.get("plugins") {
            Some(Value::Array(list)) => list.clone(),
            Some(_) => return Err(format!("network {name:?}: plugins is not a list")),
            None if obj.contains_key("type") => vec![v.clone()],
            None => return Err(format!("network {name:?}: no plugins and no type")),
        };
        if plugins.is_empty() {
            return Err(format!("network {name:?}: the plugin list is empty"));
        }
        for (i, p) in plugins.iter().enumerate() {
            let ty = p.get("type").and_then(Value::as_str).unwrap_or_default();
            if ty.is_empty() || ty.contains('/') || ty.starts_with('.') {
                return Err(format!(
                    "network {name:?}: plugin {i} has no valid type (got {ty:?})"
                ));
            }
        }
        Ok(Self {
            name,
            cni_version,
            disable_check,
            plugins,
        })
    }

    /// The conflist form, as saved with a bot's result so teardown uses the exact config
    /// that set the bot up.
    pub fn to_value(&self) -> Value {
        json!({
            "cniVersion": self.cni_version,
            "name": self.name,
            "disableCheck": self.disable_check,
            "plugins": self.plugins,
        })
    }

    /// The `type` of plugin `i`.
    pub fn plugin_type(&self, i: usize) -> &str {
        self.plugins
            .get(i)
            .and_then(|p| p.get("type"))
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// The bridge of the first `bridge` plugin (its default is `cni0`), if the network has one.
    pub fn bridge_name(&self) -> Option<String> {
        self.plugins
            .iter()
            .find(|p| p.get("type").and_then(Value::as_str) == Some("bridge"))
            .map(|p| {
                p.get("bridge")
                    .and_then(Value::as_str)
                    .unwrap_or("cni0")
                    .to_string()
            })
    }

    /// The stdin of plugin `i`: its config plus the network's `name` and `cniVersion` and,
    /// when given, `prevResult`.
    pub fn plugin_stdin(&self, i: usize, prev: Option<&Value>) -> Value {
        let mut conf = self.plugins[i].clone();
        if let Some(o) = conf.as_object_mut() {
            o.insert("name".into(), Value::String(self.name.clone()));
            o.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
            match prev {
                Some(p) => {
                    o.insert("prevResult".into(), p.clone());
                }
                None => {
                    o.remove("prevResult");
                }
            }
        }
        conf
    }

    /// Whether CHECK exists for this version (0.4.0 and later).
    pub fn supports_check(&self) -> bool {
        !matches!(
            self.cni_version.as_str(),
            "" | "0.1.0" | "0.2.0" | "0.3.0" | "0.3.1"
        )
    }
}

/// The agent's default network: a `bridge` plugin with a gateway and IP masquerade, and
/// host-local IPAM on `subnet` with a default route. `ipam_data_dir` overrides host-local's
/// store (`/var/lib/cni/networks`), which tests point into a temp dir.
///
/// `portmap` is left out on purpose: the agent reaches bots on their own address, maps no
/// ports, and every extra plugin is one more set of iptables rules to leak.
pub fn default_conflist(
    name: &str,
    bridge: &str,
    subnet: &str,
    ipam_data_dir: Option<&Path>,
) -> Value {
    let mut ipam = json!({
        "type": "host-local",
        "ranges": [[{"subnet": subnet}]],
        "routes": [{"dst": "0.0.0.0/0"}],
    });
    if let Some(dir) = ipam_data_dir {
        ipam["dataDir"] = Value::String(dir.to_string_lossy().into_owned());
    }
    json!({
        "cniVersion": DEFAULT_CNI_VERSION,
        "name": name,
        "plugins": [{
            "type": "bridge",
            "bridge": bridge,
            "isGateway": true,
            "ipMasq": true,
            "hairpinMode": false,
            "ipam": ipam,
        }],
    })
}

/// Finds network `name` in `dir`: files ending in `.conflist`, `.conf` or `.json`, in name
/// order, first match wins. Files that do not parse are skipped with a warning, as libcni
/// does, so one broken file cannot take every network down.
pub fn find_network(
    dir: &Path,
    name: &str,
) -> Result<Option<(PathBuf, NetworkConfList)>, AgentError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(AgentError::io(dir, e)),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| EXTENSIONS.contains(&x))
        })
        .collect();
    files.sort();
    for path in files {
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read cni config");
                continue;
            }
        };
        let parsed = serde_json::from_slice::<Value>(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|v| NetworkConfList::parse(&v));
        match parsed {
            Ok(list) if list.name == name => return Ok(Some((path, list))),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping invalid cni config")
            }
        }
    }
    Ok(None)
}

/// Writes `conflist` as `<dir>/<name>.conflist`, atomically (temp file, then rename).
pub fn write_conflist(dir: &Path, name: &str, conflist: &Value) -> Result<PathBuf, AgentError> {
    std::fs::create_dir_all(dir).map_err(|e| AgentError::io(dir, e))?;
    let path = dir.join(format!("{name}.conflist"));
    let tmp = dir.join(format!(".{name}.conflist.tmp"));
    let text = serde_json::to_vec_pretty(conflist).map_err(|e| AgentError::Network {
        op: "write cni config".into(),
        reason: e.to_string(),
    })?;
    std::fs::write(&tmp, text).map_err(|e| AgentError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| AgentError::io(&path, e))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_shapes() {
        let list = NetworkConfList::parse(&json!({
            "cniVersion": "0.4.0", "name": "n",
            "plugins": [{"type": "bridge"}, {"type": "portmap", "capabilities": {"portMappings": true}}]
        }))
        .unwrap();
        assert_eq!(list.plugins.len(), 2);
        assert_eq!(list.plugin_type(1), "portmap");
        assert_eq!(list.bridge_name().as_deref(), Some("cni0"));
        assert!(list.supports_check());

        let single = NetworkConfList::parse(&json!({
            "cniVersion": "0.3.1", "name": "s", "type": "bridge", "bridge": "br9"
        }))
        .unwrap();
        assert_eq!(single.plugins.len(), 1);
        assert_eq!(single.bridge_name().as_deref(), Some("br9"));
        assert!(!single.supports_check());
        // The saved form round-trips.
        assert_eq!(NetworkConfList::parse(&single.to_value()).unwrap(), single);
    }

    #[test]
    fn parse_errors() {
        let cases = [
            (json!({"plugins": [{"type": "bridge"}]}), "no name"),
            (json!({"name": "n", "plugins": []}), "empty"),
            (json!({"name": "n"}), "no plugins"),
            (json!({"name": "n", "plugins": [{"x": 1}]}), "no valid type"),
            (
                json!({"name": "n", "plugins": [{"type": "../sh"}]}),
                "no valid type",
            ),
            (json!({"name": "n", "plugins": {}}), "not a list"),
        ];
        for (v, want) in cases {
            let e = NetworkConfList::parse(&v).unwrap_err();
            assert!(e.contains(want), "{v}: {e}");
        }
    }

    #[test]
    fn plugin_stdin_carries_name_version_and_prev() {
        let list = NetworkConfList::parse(&json!({
            "cniVersion": "1.0.0", "name": "n",
            "plugins": [{"type": "bridge", "name": "ignored", "prevResult": {"stale": true}}]
        }))
        .unwrap();
        let first = list.plugin_stdin(0, None);
        assert_eq!(first["name"], "n");
        assert_eq!(first["cniVersion"], "1.0.0");
        assert!(first.get("prevResult").is_none());
        let prev = json!({"ips": []});
        assert_eq!(list.plugin_stdin(0, Some(&prev))["prevResult"], prev);
    }

    #[test]
    fn default_network_and_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let v = default_conflist("memoh-cni", "cni0", "10.88.0.0/16", Some(Path::new("/x")));
        let list = NetworkConfList::parse(&v).unwrap();
        assert_eq!(list.cni_version, DEFAULT_CNI_VERSION);
        assert_eq!(list.plugins[0]["ipam"]["dataDir"], "/x");
        assert_eq!(
            list.plugins[0]["ipam"]["ranges"][0][0]["subnet"],
            "10.88.0.0/16"
        );

        assert!(find_network(dir.path(), "memoh-cni").unwrap().is_none());
        std::fs::write(dir.path().join("00-broken.conflist"), "{").unwrap();
        std::fs::write(
            dir.path().join("05-other.conf"),
            r#"{"cniVersion":"0.4.0","name":"other","type":"bridge"}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("README"), "not a config").unwrap();
        write_conflist(dir.path(), "memoh-cni", &v).unwrap();
        let (path, found) = find_network(dir.path(), "memoh-cni").unwrap().unwrap();
        assert_eq!(path, dir.path().join("memoh-cni.conflist"));
        assert_eq!(found, list);
        let (_, other) = find_network(dir.path(), "other").unwrap().unwrap();
        assert_eq!(other.plugin_type(0), "bridge");
        assert!(find_network(&dir.path().join("missing"), "x")
            .unwrap()
            .is_none());
    }
}
