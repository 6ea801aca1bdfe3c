//! Shared passes: concurrent setups share the rebuilds of the ruleset and the checks of the
//! host rules, and a request is only ever answered by a pass that began after it.

use super::*;

/// An ADD result for bot number `i` (its own address and host veth).
fn add_result_of(i: usize) -> Value {
    let mut r = add_result(&format!("10.210.3.{}", 10 + i));
    r["interfaces"][1]["name"] = json!(format!("veth{:04}", 100 + i));
    r["interfaces"][2]["sandbox"] = json!(format!("/run/netns/memoh-test.b{i}"));
    r
}

#[tokio::test]
async fn concurrent_setups_share_passes_and_the_last_one_sees_every_bot() {
    const BOTS: usize = 8;
    let e = env();
    *e.net.firewall().ruleset_delay.lock().unwrap() = Duration::from_millis(20);
    for i in 0..BOTS {
        e.net
            .netns()
            .set(&format!("/run/netns/memoh-test.b{i}"), &[]);
        e.net
            .cni()
            .exec()
            .answer(CniCommand::Add, Ok(Some(add_result_of(i))));
    }
    let paths: Vec<PathBuf> = (0..BOTS)
        .map(|i| PathBuf::from(format!("/run/netns/memoh-test.b{i}")))
        .collect();
    let names: Vec<String> = (0..BOTS).map(|i| format!("b{i}")).collect();
    let setups = names
        .iter()
        .zip(&paths)
        .map(|(bot, path)| e.net.setup(bot, path));
    for r in futures::future::join_all(setups).await {
        r.unwrap();
    }
    let calls = e.net.firewall().calls();
    let count = |what: &str| calls.iter().filter(|c| c.as_str() == what).count();
    let rebuilds = count("ruleset") + count("no-ruleset");
    // One pass per request would be 2 rebuilds and one masquerade check per setup.
    assert!(
        rebuilds < BOTS,
        "{rebuilds} rebuilds for {BOTS} setups: {calls:?}"
    );
    assert!(
        count("masq 10.210.3.0/24") < BOTS / 2,
        "masquerade checked {} times: {calls:?}",
        count("masq 10.210.3.0/24")
    );
    // Yet the ruleset in place holds every bot.
    let rules = e.net.firewall().ruleset.lock().unwrap().clone();
    for i in 0..BOTS {
        assert!(
            rules.contains(&format!("veth{:04}", 100 + i)),
            "bot {i}: {rules}"
        );
    }
}

#[tokio::test]
async fn a_request_after_a_pass_gets_a_pass_of_its_own() {
    let e = env();
    e.net.netns().set(NS, &[]);
    e.net
        .cni()
        .exec()
        .answer(CniCommand::Add, Ok(Some(add_result("10.210.3.2"))));
    let bn = e.net.setup("a", Path::new(NS)).await.unwrap();
    let fw = e.net.firewall();
    // Each call below comes after the last pass ended: none may be answered by it (a rule
    // removed from the host meanwhile must come back).
    for round in 1..=2 {
        let before = fw.calls().len();
        e.net.ensure_host_rules(&bn).await.unwrap();
        assert_eq!(
            fw.calls()[before..],
            [
                "masq 10.210.3.0/24",
                "isolate br-test",
                "bridge-nf",
                "ruleset"
            ],
            "round {round}"
        );
        let before = fw.calls().len();
        e.net.contain().await.unwrap();
        assert_eq!(fw.calls()[before..], ["ruleset"], "round {round}");
    }
}

#[tokio::test]
async fn a_failed_pass_answers_nobody() {
    let e = env();
    e.net.netns().set(NS, &[]);
    e.net
        .cni()
        .exec()
        .answer(CniCommand::Add, Ok(Some(add_result("10.210.3.2"))));
    e.net.setup("a", Path::new(NS)).await.unwrap();
    let fw = e.net.firewall();
    *fw.ruleset_delay.lock().unwrap() = Duration::from_millis(20);
    *fw.fail_ruleset.lock().unwrap() = true;
    // Two requests while the first pass fails: the second must not take that failure for a
    // covering pass, and must not report success without a rebuild of its own.
    let (a, b) = tokio::join!(e.net.contain(), e.net.contain());
    assert!(a.is_err() && b.is_err(), "{a:?} {b:?}");
    *fw.fail_ruleset.lock().unwrap() = false;
    let before = fw.calls().len();
    e.net.contain().await.unwrap();
    assert_eq!(fw.calls()[before..], ["ruleset"]);
}
