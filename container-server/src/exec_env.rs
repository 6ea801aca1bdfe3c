//! The environment rule of a `bridgepb` Exec (WIRE-BRIDGE.md section 3, "Env"): with `env`,
//! `clean_env` and `unset_env` all empty a command gets the server's environment; else it
//! starts from the server's environment (nothing if `clean_env`), loses every `unset_env` key
//! (an entry ending in `*` names a prefix), then gets the `env` entries (the last one of a key
//! wins).

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;

/// Whether `key` is named by an `unset_env` entry: equal to it, or, for an entry `P*`,
/// starting with `P`.
pub fn unset_matches(entry: &str, key: &[u8]) -> bool {
    match entry.strip_suffix('*') {
        Some(prefix) => key.starts_with(prefix.as_bytes()),
        None => key == entry.as_bytes(),
    }
}

/// The base a bridge command's environment starts from, before its `env` entries: `None`
/// when the server's own environment stays as it is (no `clean_env`, no `unset_env`), else
/// exactly these variables (`server` without the `unset` keys, or nothing if `clean`).
pub fn bridge_base<I>(server: I, clean: bool, unset: &[String]) -> Option<Vec<(OsString, OsString)>>
where
    I: IntoIterator<Item = (OsString, OsString)>,
{
    if !clean && unset.is_empty() {
        return None;
    }
    if clean {
        return Some(Vec::new());
    }
    Some(
        server
            .into_iter()
            .filter(|(k, _)| !unset.iter().any(|u| unset_matches(u, k.as_bytes())))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole environment a command gets from `base` (`None`: `server`) plus `add`, each
    /// key once, the last value winning: what `exec::prepare_child` makes of them.
    fn resolve<I>(
        server: I,
        base: Option<&[(OsString, OsString)]>,
        add: &[(String, String)],
    ) -> Vec<(OsString, OsString)>
    where
        I: IntoIterator<Item = (OsString, OsString)>,
    {
        let mut env: Vec<(OsString, OsString)> = match base {
            Some(b) => b.to_vec(),
            None => server.into_iter().collect(),
        };
        for (k, v) in add {
            env.retain(|(key, _)| key.as_bytes() != k.as_bytes());
            env.push((k.into(), v.into()));
        }
        env
    }

    fn server() -> Vec<(OsString, OsString)> {
        [
            ("PATH", "/usr/bin"),
            ("HOME", "/root"),
            ("MEMOH_A", "1"),
            ("MEMOH_B", "2"),
            ("MEMO", "3"),
        ]
        .iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)))
        .collect()
    }

    fn keys_values(env: &[(OsString, OsString)]) -> Vec<String> {
        env.iter()
            .map(|(k, v)| format!("{}={}", k.to_string_lossy(), v.to_string_lossy()))
            .collect()
    }

    #[test]
    fn unset_entries_name_keys_or_prefixes() {
        let cases = [
            ("HOME", "HOME", true),
            ("HOME", "HOMEX", false),
            ("HOM", "HOME", false),
            ("HOM*", "HOME", true),
            ("MEMOH_*", "MEMOH_A", true),
            ("MEMOH_*", "MEMO", false),
            ("*", "ANYTHING", true),
            ("", "HOME", false),
            ("H*ME", "HOME", false),
        ];
        for (entry, key, want) in cases {
            assert_eq!(unset_matches(entry, key.as_bytes()), want, "{entry} {key}");
        }
    }

    #[test]
    fn the_rule_table() {
        let add = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(k, x)| (k.to_string(), x.to_string()))
                .collect()
        };
        let unset = |v: &[&str]| -> Vec<String> { v.iter().map(|s| s.to_string()).collect() };
        // (clean, unset, env) -> the child's environment
        type Case = (bool, Vec<String>, Vec<(String, String)>, Vec<&'static str>);
        let cases: Vec<Case> = vec![
            (
                false,
                unset(&[]),
                add(&[]),
                vec![
                    "PATH=/usr/bin",
                    "HOME=/root",
                    "MEMOH_A=1",
                    "MEMOH_B=2",
                    "MEMO=3",
                ],
            ),
            (
                false,
                unset(&[]),
                add(&[("HOME", "/data"), ("X", "1"), ("X", "2")]),
                vec![
                    "PATH=/usr/bin",
                    "MEMOH_A=1",
                    "MEMOH_B=2",
                    "MEMO=3",
                    "HOME=/data",
                    "X=2",
                ],
            ),
            (
                false,
                unset(&["MEMOH_*", "HOME"]),
                add(&[]),
                vec!["PATH=/usr/bin", "MEMO=3"],
            ),
            (
                false,
                unset(&["HOME"]),
                add(&[("HOME", "/x")]),
                vec![
                    "PATH=/usr/bin",
                    "MEMOH_A=1",
                    "MEMOH_B=2",
                    "MEMO=3",
                    "HOME=/x",
                ],
            ),
            (true, unset(&[]), add(&[]), vec![]),
            (true, unset(&["PATH"]), add(&[("A", "b=c")]), vec!["A=b=c"]),
            (false, unset(&["*"]), add(&[("Y", "")]), vec!["Y="]),
        ];
        for (clean, unset, add, want) in cases {
            let base = bridge_base(server(), clean, &unset);
            if !clean && unset.is_empty() {
                assert!(base.is_none(), "server env kept as is");
            }
            let env = resolve(server(), base.as_deref(), &add);
            assert_eq!(keys_values(&env), want, "{clean} {unset:?} {add:?}");
        }
    }
}
