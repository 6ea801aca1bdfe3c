//! Unit tests of the CNI protocol logic and of the plugin lock's modes, over the fake executor.

use super::fake::FakeExec;
use super::*;
use serde_json::json;

fn two_plugins() -> NetworkConfList {
    NetworkConfList::parse(&json!({
        "cniVersion": "1.0.0", "name": "n",
        "plugins": [{"type": "bridge"}, {"type": "tuning"}]
    }))
    .unwrap()
}

fn rt() -> RuntimeConf {
    RuntimeConf {
        container_id: "mcp-a".into(),
        netns: Some("/run/netns/memoh-a".into()),
        ifname: "eth0".into(),
        ip: None,
    }
}

#[test]
fn cni_args_ask_for_an_address_only_when_given() {
    assert_eq!(rt().cni_args(), "");
    let with_ip = RuntimeConf {
        ip: Some("10.88.0.7".parse().unwrap()),
        ..rt()
    };
    assert_eq!(with_ip.cni_args(), "IgnoreUnknown=1;IP=10.88.0.7");
}

#[tokio::test]
async fn add_chains_prev_result() {
    let fake = FakeExec::default();
    fake.answer(CniCommand::Add, Ok(Some(json!({"step": 1}))));
    fake.answer(CniCommand::Add, Ok(Some(json!({"step": 2}))));
    let chain = CniChain::new(fake);
    let out = chain.add(&two_plugins(), &rt()).await.unwrap();
    assert_eq!(out, json!({"step": 2}));
    let calls = chain.exec().calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].plugin, "bridge");
    assert!(calls[0].config.get("prevResult").is_none());
    assert_eq!(calls[0].config["name"], "n");
    assert_eq!(calls[1].plugin, "tuning");
    assert_eq!(calls[1].config["prevResult"], json!({"step": 1}));
}

#[tokio::test]
async fn add_stops_at_first_error() {
    let fake = FakeExec::default();
    fake.answer(CniCommand::Add, Err("boom"));
    let chain = CniChain::new(fake);
    let e = chain.add(&two_plugins(), &rt()).await.unwrap_err();
    assert!(e.to_string().contains("boom"), "{e}");
    assert_eq!(chain.exec().calls().len(), 1);
}

#[tokio::test]
async fn del_runs_in_reverse_and_all_of_them() {
    let fake = FakeExec::default();
    fake.answer(CniCommand::Del, Err("tuning broke"));
    let chain = CniChain::new(fake);
    let prev = json!({"ips": []});
    let e = chain
        .del(&two_plugins(), &rt(), Some(&prev))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("tuning broke"), "{e}");
    let calls = chain.exec().calls();
    let order: Vec<_> = calls.iter().map(|c| c.plugin.as_str()).collect();
    assert_eq!(order, ["tuning", "bridge"]);
    assert!(calls.iter().all(|c| c.config["prevResult"] == prev));
}

#[tokio::test]
async fn check_skipped_when_disabled_or_old() {
    for net in [
        json!({"cniVersion": "1.0.0", "name": "n", "disableCheck": true, "plugins": [{"type": "bridge"}]}),
        json!({"cniVersion": "0.3.1", "name": "n", "plugins": [{"type": "bridge"}]}),
    ] {
        let chain = CniChain::new(FakeExec::default());
        let net = NetworkConfList::parse(&net).unwrap();
        chain.check(&net, &rt(), &json!({})).await.unwrap();
        assert!(chain.exec().calls().is_empty());
    }
    let chain = CniChain::new(FakeExec::default());
    chain
        .check(&two_plugins(), &rt(), &json!({"x": 1}))
        .await
        .unwrap();
    let calls = chain.exec().calls();
    assert_eq!(calls.len(), 2);
    assert!(calls.iter().all(|c| c.command == CniCommand::Check));
}

/// A one-plugin bridge network named `name` on bridge `bridge`.
fn bridge_net(name: &str, bridge: &str) -> NetworkConfList {
    NetworkConfList::parse(&json!({
        "cniVersion": "1.0.0", "name": name,
        "plugins": [{"type": "bridge", "bridge": bridge,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.9.0.0/24"}]]}}]
    }))
    .unwrap()
}

fn rt_of(id: &str) -> RuntimeConf {
    RuntimeConf {
        container_id: id.into(),
        ..rt()
    }
}

/// A fake whose ADDs take 40 ms, with `n` answers, on which bridge `br-up` exists.
fn slow_fake(n: usize) -> FakeExec {
    let fake = FakeExec::default();
    *fake.delay.lock().unwrap() = Duration::from_millis(40);
    fake.links.lock().unwrap().insert("br-up".into());
    for _ in 0..n {
        fake.answer(CniCommand::Add, Ok(Some(json!({}))));
    }
    fake
}

/// How many of `calls` ran at the same time, at most.
fn max_overlap(calls: &[fake::Call]) -> usize {
    calls
        .iter()
        .map(|c| {
            calls
                .iter()
                .filter(|o| o.span.0 < c.span.1 && c.span.0 < o.span.1)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn the_lock_mode_follows_the_bridge_and_the_plugins() {
    let chain = CniChain::new(slow_fake(0));
    assert_eq!(chain.add_mode(&bridge_net("n", "br-up")), LockMode::Shared);
    assert_eq!(
        chain.add_mode(&bridge_net("n", "br-new")),
        LockMode::Exclusive
    );
    // An unknown plugin, or an unknown IPAM, keeps the whole chain exclusive.
    let odd = NetworkConfList::parse(&json!({
        "cniVersion": "1.0.0", "name": "n",
        "plugins": [{"type": "bridge", "bridge": "br-up"}, {"type": "vendor-thing"}]
    }))
    .unwrap();
    assert_eq!(chain.add_mode(&odd), LockMode::Exclusive);
    assert_eq!(CniChain::<FakeExec>::other_mode(&odd), LockMode::Exclusive);
    let dhcp = NetworkConfList::parse(&json!({
        "cniVersion": "1.0.0", "name": "n",
        "plugins": [{"type": "bridge", "bridge": "br-up", "ipam": {"type": "dhcp"}}]
    }))
    .unwrap();
    assert_eq!(chain.add_mode(&dhcp), LockMode::Exclusive);
    let known = bridge_net("n", "br-new");
    assert_eq!(CniChain::<FakeExec>::other_mode(&known), LockMode::Shared);
    // A name that is no interface is never taken for an existing bridge.
    for name in ["", ".", "..", "a/b", "x y", "a-name-far-too-long"] {
        assert!(!valid_link_name(name), "{name:?}");
    }
    assert!(valid_link_name("cni0"));
}

/// Other tests of this binary take the process-wide lock too (exclusively, for bridges their
/// fakes lack), and the lock is fair: one of them queued in between splits a batch. So a few
/// tries; shared ADDs must overlap in one of them (exclusive ones never do).
const OVERLAP_TRIES: usize = 5;

#[tokio::test]
async fn adds_on_an_existing_bridge_overlap() {
    let net = bridge_net("n", "br-up");
    let ids: Vec<String> = (0..6).map(|i| format!("mcp-s{i}")).collect();
    let rts: Vec<RuntimeConf> = ids.iter().map(|id| rt_of(id)).collect();
    let mut best = 0;
    for _ in 0..OVERLAP_TRIES {
        let chain = CniChain::new(slow_fake(6));
        let runs = rts.iter().map(|rt| chain.add(&net, rt));
        for r in futures::future::join_all(runs).await {
            r.unwrap();
        }
        let calls = chain.exec().calls();
        assert_eq!(calls.len(), 6);
        assert!(calls.iter().all(|c| c.lock == LockMode::Shared));
        best = best.max(max_overlap(&calls));
        if best >= 3 {
            break;
        }
    }
    assert!(
        best >= 3,
        "shared ADDs did not overlap (at most {best} at once)"
    );
}

#[tokio::test]
async fn an_add_that_creates_the_bridge_and_a_retry_overlap_nothing() {
    let chain = CniChain::new(slow_fake(8));
    let up = bridge_net("n", "br-up");
    let new = bridge_net("m", "br-new");
    let rts: Vec<RuntimeConf> = (0..8).map(|i| rt_of(&format!("mcp-x{i}"))).collect();
    let runs = rts.iter().enumerate().map(|(i, rt)| {
        let chain = &chain;
        let (up, new) = (&up, &new);
        async move {
            match i {
                // The first ADD of another network: its bridge is still to be created.
                2 => chain.add(new, rt).await,
                // A retry.
                5 => chain.add_exclusive(up, rt).await,
                _ => chain.add(up, rt).await,
            }
        }
    });
    for r in futures::future::join_all(runs).await {
        r.unwrap();
    }
    let calls = chain.exec().calls();
    assert_eq!(calls.len(), 8);
    let alone: Vec<_> = calls
        .iter()
        .filter(|c| c.lock == LockMode::Exclusive)
        .collect();
    let names: Vec<&str> = alone.iter().map(|c| c.container.as_str()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names.contains(&"mcp-x2") && names.contains(&"mcp-x5"),
        "{names:?}"
    );
    for x in alone {
        for o in calls.iter().filter(|o| o.container != x.container) {
            assert!(
                o.span.1 <= x.span.0 || x.span.1 <= o.span.0,
                "{} (exclusive) overlapped {}",
                x.container,
                o.container
            );
        }
    }
    // The shared ones still overlapped each other.
    assert!(max_overlap(&calls) >= 2);
}

#[tokio::test]
async fn check_and_del_of_known_plugins_overlap() {
    let net = bridge_net("n", "br-new");
    let rts: Vec<RuntimeConf> = (0..4).map(|i| rt_of(&format!("mcp-d{i}"))).collect();
    let prev = json!({});
    let mut best = 0;
    for _ in 0..OVERLAP_TRIES {
        let chain = CniChain::new(slow_fake(0));
        let dels = rts.iter().map(|rt| chain.del(&net, rt, Some(&prev)));
        let checks = rts.iter().map(|rt| chain.check(&net, rt, &prev));
        let (d, c) = tokio::join!(
            futures::future::join_all(dels),
            futures::future::join_all(checks)
        );
        assert!(d.into_iter().chain(c).all(|r| r.is_ok()));
        let calls = chain.exec().calls();
        assert!(calls.iter().all(|c| c.lock == LockMode::Shared));
        best = best.max(max_overlap(&calls));
        if best >= 3 {
            break;
        }
    }
    assert!(
        best >= 3,
        "DEL and CHECK did not overlap (at most {best} at once)"
    );
}

#[test]
fn failures_become_plugin_errors() {
    let rt = rt();
    let inv = Invocation {
        command: CniCommand::Add,
        plugin: "bridge",
        runtime: &rt,
        config: json!({}),
        lock: LockMode::Shared,
    };
    let cases: [(&[u8], &str, u64, &str); 3] = [
        (
            br#"{"code":11,"msg":"failed to allocate","details":"duplicate allocation is not allowed"}"#,
            "",
            11,
            "failed to allocate; duplicate allocation is not allowed",
        ),
        (b"", "panic: oops", 0, "panic: oops"),
        (b"", "", 0, "no output"),
    ];
    for (stdout, stderr, code, reason) in cases {
        match plugin_failure(&inv, stdout, stderr) {
            AgentError::CniPlugin {
                code: c, reason: r, ..
            } => {
                assert_eq!((c, r.as_str()), (code, reason));
            }
            other => panic!("{other:?}"),
        }
    }
    let msg = plugin_failure(&inv, br#"{"code":7,"msg":"bad config"}"#, "").to_string();
    assert_eq!(
        msg,
        "cni plugin bridge ADD for mcp-a failed (code 7): bad config"
    );
}

#[tokio::test]
async fn missing_plugin_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let exec = ExecPlugins::new(vec![dir.path().to_path_buf()], DEFAULT_PLUGIN_TIMEOUT);
    let rt = rt();
    let e = exec
        .exec(Invocation {
            command: CniCommand::Add,
            plugin: "nope",
            runtime: &rt,
            config: json!({}),
            lock: LockMode::Shared,
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("plugin \"nope\" not found"), "{e}");
}
