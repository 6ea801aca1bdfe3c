use super::*;

/// Checks that `text` is exposition text: `# HELP name text`, `# TYPE name kind`, and
/// samples `name{k="v",...} value` or `name value`, each sample of a declared family.
fn assert_parses(text: &str) {
    let name_ok = |n: &str| {
        !n.is_empty()
            && !n.starts_with(|c: char| c.is_ascii_digit())
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut families: Vec<(String, String)> = Vec::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# HELP ") {
            let (name, _) = rest.split_once(' ').expect("help text");
            assert!(name_ok(name), "bad name in {l:?}");
            continue;
        }
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("type");
            assert!(name_ok(name), "bad name in {l:?}");
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "bad type in {l:?}"
            );
            families.push((name.to_string(), kind.to_string()));
            continue;
        }
        assert!(!l.starts_with('#'), "unexpected comment {l:?}");
        let (series, value) = l.rsplit_once(' ').expect("sample has a value");
        assert!(value.parse::<f64>().is_ok(), "bad value in {l:?}");
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').expect("closing brace");
                // Values here hold no `",` so a split is enough.
                for pair in labels.split("\",") {
                    let (k, v) = pair.split_once('=').expect("label pair");
                    assert!(name_ok(k), "bad label name in {l:?}");
                    assert!(v.starts_with('"'), "unquoted label value in {l:?}");
                }
                name
            }
            None => series,
        };
        assert!(name_ok(name), "bad sample name in {l:?}");
        let (family, kind) = families.last().expect("sample after a TYPE line");
        let suffix = name
            .strip_prefix(family.as_str())
            .expect("sample of its family");
        let allowed: &[&str] = match kind.as_str() {
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        assert!(allowed.contains(&suffix), "{l:?} in family {family}");
    }
}

fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

#[test]
fn exposition() {
    let m = Metrics::default();
    m.restart();
    m.restart();
    m.cni_retry();
    m.eviction(Eviction::Failure);
    m.rpc("proxy", "Exec", Duration::from_millis(3));
    m.rpc("proxy", "Exec", Duration::from_millis(700));
    m.tool_call("builtin", "read", Duration::from_micros(100));
    m.snapshot(Duration::from_secs(2));
    let sample = |bot: &str, state: &str| BotSample {
        bot: bot.to_string(),
        state: state.to_string(),
        ..Default::default()
    };
    let mut a = sample("a", "running");
    a.memory_bytes = Some(1 << 20);
    a.memory_limit_bytes = Some(256 << 20);
    a.cpu_seconds = Some(1.5);
    a.cpu_limit = Some(0.5);
    a.pids = Some(7);
    a.oom_kills = Some(2);
    let bots = vec![a, sample("b", "running"), sample("c", "paused")];
    m.oom_kills(2);
    let text = m.render(Some(&bots));
    assert_parses(&text);
    for line in [
        "# HELP memoh_bots Bots by task state.",
        "# TYPE memoh_bots gauge",
        "memoh_bots{state=\"running\"} 2",
        "memoh_bots{state=\"stopped\"} 0",
        "memoh_bots{state=\"paused\"} 1",
        "memoh_bot_memory_bytes{bot=\"a\"} 1048576",
        "memoh_bot_memory_limit_bytes{bot=\"a\"} 268435456",
        "# TYPE memoh_bot_cpu_seconds_total counter",
        "memoh_bot_cpu_seconds_total{bot=\"a\"} 1.5",
        "memoh_bot_cpu_limit{bot=\"a\"} 0.5",
        "memoh_bot_pids{bot=\"a\"} 7",
        "memoh_bot_oom_kills_total{bot=\"a\"} 2",
        "memoh_oom_kills_total 2",
        "# HELP memoh_bot_restarts_total Automatic restarts of bots whose server exited.",
        "# TYPE memoh_bot_restarts_total counter",
        "memoh_bot_restarts_total 2",
        "memoh_cni_retries_total 1",
        "memoh_cni_errors_total 0",
        "memoh_bot_lost_states_total 0",
        "memoh_stale_bundles_removed_total 0",
        "# TYPE memoh_pool_evictions_total counter",
        "memoh_pool_evictions_total{reason=\"failure\"} 1",
        "memoh_pool_evictions_total{reason=\"route_changed\"} 0",
        "memoh_pool_evictions_total{reason=\"explicit\"} 0",
        "# TYPE memoh_rpc_duration_seconds histogram",
        "memoh_rpc_duration_seconds_bucket{api=\"proxy\",method=\"Exec\",le=\"0.0025\"} 0",
        "memoh_rpc_duration_seconds_bucket{api=\"proxy\",method=\"Exec\",le=\"0.005\"} 1",
        "memoh_rpc_duration_seconds_bucket{api=\"proxy\",method=\"Exec\",le=\"1\"} 2",
        "memoh_rpc_duration_seconds_bucket{api=\"proxy\",method=\"Exec\",le=\"+Inf\"} 2",
        "memoh_rpc_duration_seconds_count{api=\"proxy\",method=\"Exec\"} 2",
        "# TYPE memoh_mcp_tool_call_duration_seconds histogram",
        "memoh_mcp_tool_call_duration_seconds_count{server=\"builtin\",tool=\"read\"} 1",
        "# TYPE memoh_snapshot_cycle_duration_seconds histogram",
        "memoh_snapshot_cycle_duration_seconds_bucket{le=\"1\"} 0",
        "memoh_snapshot_cycle_duration_seconds_bucket{le=\"2.5\"} 1",
        "memoh_snapshot_cycle_duration_seconds_count 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
    let sum = value(
        &text,
        "memoh_rpc_duration_seconds_sum{api=\"proxy\",method=\"Exec\"}",
    );
    assert!((sum - 0.703).abs() < 1e-9, "{sum}");
    assert_eq!(
        value(&text, "memoh_snapshot_cycle_duration_seconds_sum"),
        2.0
    );
    assert_eq!(m.rpc_count("proxy", "Exec"), 2);
    assert_eq!(m.rpc_count("proxy", "Nope"), 0);
    // Without a bot list the gauge is left out rather than reported as zero.
    let without = m.render(None);
    assert_parses(&without);
    assert!(!without.contains("memoh_bots"), "{without}");
    assert!(!without.contains("memoh_bot_memory"), "{without}");
    // A bot without a figure has no series of it (not a zero).
    assert!(
        !text.contains("memoh_bot_memory_bytes{bot=\"b\"}"),
        "{text}"
    );
}

#[test]
fn histograms_keep_their_buckets() {
    let m = Metrics::default();
    m.rpc("control", "CreateBot", Duration::from_millis(20));
    m.snapshot(Duration::from_secs(200));
    let text = m.render(None);
    let bounds = |prefix: &str| -> Vec<(String, f64)> {
        text.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(prefix)?;
                let (le, v) = rest.split_once("\"} ")?;
                Some((le.to_string(), v.parse().ok()?))
            })
            .collect()
    };
    let as_labels = |b: &[f64]| -> Vec<String> {
        b.iter()
            .map(|v| v.to_string())
            .chain(["+Inf".to_string()])
            .collect()
    };
    let rpc =
        bounds("memoh_rpc_duration_seconds_bucket{api=\"control\",method=\"CreateBot\",le=\"");
    let les: Vec<_> = rpc.iter().map(|(le, _)| le.clone()).collect();
    assert_eq!(les, as_labels(LATENCY_BUCKETS));
    // Cumulative: 0 below 25 ms, 1 from there on.
    for (le, n) in &rpc {
        let expect = if le == "+Inf" || le.parse::<f64>().unwrap() >= 0.02 {
            1.0
        } else {
            0.0
        };
        assert_eq!(*n, expect, "le={le}");
    }
    let snap = bounds("memoh_snapshot_cycle_duration_seconds_bucket{le=\"");
    let les: Vec<_> = snap.iter().map(|(le, _)| le.clone()).collect();
    assert_eq!(les, as_labels(SNAPSHOT_BUCKETS));
    // 200 s is past the last bound: only +Inf counts it.
    let counts: Vec<_> = snap.iter().map(|(_, n)| *n).collect();
    assert_eq!(counts.last(), Some(&1.0));
    assert!(counts[..counts.len() - 1].iter().all(|n| *n == 0.0));
}

#[test]
fn label_sets_are_capped() {
    let m = Metrics::default();
    for i in 0..MAX_SERIES + 5 {
        m.rpc("control", &format!("M{i}"), Duration::from_millis(1));
    }
    assert_eq!(m.rpc_count("other", "other"), 5);
    assert_eq!(m.rpc_count("control", "M0"), 1);
    let text = m.render(None);
    let series = text
        .lines()
        .filter(|l| l.starts_with("memoh_rpc_duration_seconds_count{"))
        .count();
    assert_eq!(series, MAX_SERIES + 1);
}

#[test]
fn label_values_are_escaped() {
    assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    let m = Metrics::default();
    m.tool_call("stdio", "a\"b\\c\nd", Duration::from_millis(1));
    let text = m.render(None);
    let line =
        "memoh_mcp_tool_call_duration_seconds_count{server=\"stdio\",tool=\"a\\\"b\\\\c\\nd\"} 1";
    assert!(text.lines().any(|l| l == line), "{text}");
}
