//! System tests of the operator's tools (tier 3): `memoh-agent doctor` on a working and on a
//! broken configuration, and `/metrics` of a running agent after a bot and an exec.
//!
//! Needs root and `eval "$(scripts/test-env.sh env)"`; without it the tests that need
//! containerd print "skipped" and pass, except under `CI`, where they fail.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::{output_within, Env, TestAgent, AGENT, CLI_LIMIT};

fn doctor(config: &std::path::Path) -> (i32, String) {
    let mut c = Command::new(AGENT);
    c.arg("doctor").arg("--config").arg(config);
    let out = output_within(c, None, CLI_LIMIT);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A TCP port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An agent with the test image, its MCP (and metrics) listener on a free port.
fn agent_with_http(env: &Env) -> (TestAgent, u16) {
    let port = free_port();
    let mut a = TestAgent::new(env, &format!("mcp_listen = \"127.0.0.1:{port}\""));
    a.serve();
    a.ok(&["image", "import", &env.tar.display().to_string()]);
    (a, port)
}

#[test]
fn doctor_passes_against_a_working_agent() {
    let Some(env) = Env::get(false) else { return };
    let (a, _) = agent_with_http(&env);
    let (code, text) = doctor(&a.config);
    assert_eq!(code, 0, "doctor failed:\n{text}");
    for name in [
        "containerd",
        "runc",
        "cni plugins",
        "cni config",
        "iptables",
        "ip_forward",
        "cgroups",
        "image",
        "task bundles",
        "socket dir",
        "agent",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("ok      {name} "))),
            "{name} is not ok:\n{text}"
        );
    }
    // Warnings may remain (the test's server binary is a dynamically linked debug build).
    assert!(!text.lines().any(|l| l.starts_with("problem ")), "{text}");
    let last = text.lines().last().unwrap_or_default();
    assert!(
        last == "all checks passed" || last.starts_with("0 problem(s), "),
        "{text}"
    );
}

#[test]
fn doctor_fails_on_a_bad_socket_and_names_the_fix() {
    // Needs no containerd: everything it points at is missing.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "containerd_socket = {:?}\ncontrol_socket = {:?}\ncni_conf_dir = {:?}\n",
            dir.path().join("no/containerd.sock").display().to_string(),
            dir.path().join("run/agent.sock").display().to_string(),
            dir.path().join("cni").display().to_string(),
        ),
    )
    .unwrap();
    let (code, text) = doctor(&config);
    assert_ne!(code, 0, "doctor passed on a missing socket:\n{text}");
    let line = |name: &str| {
        text.lines()
            .find(|l| l.get(8..).is_some_and(|r| r.starts_with(name)))
            .unwrap_or_else(|| panic!("no {name} line:\n{text}"))
            .to_string()
    };
    let c = line("containerd");
    assert!(c.starts_with("problem "), "{c}");
    assert!(c.contains("fix: systemctl start containerd"), "{c}");
    assert!(c.contains(&config.display().to_string()), "{c}");
    assert!(line("image").starts_with("problem "), "{text}");
    let agent = line("agent");
    assert!(
        agent.contains("fix: systemctl start memoh-agent"),
        "{agent}"
    );
    // A missing directory under a writable parent is created at start, not a problem.
    assert!(line("socket dir").starts_with("ok "), "{text}");
    assert!(
        text.lines().last().unwrap().contains("problem(s)"),
        "{text}"
    );
}

#[test]
fn doctor_finds_a_half_deleted_task_bundle_and_its_fix_works() {
    // Needs no containerd: the check reads containerd's state directory. This one is the
    // test's, laid out as containerd 1.6 leaves it when killed mid-delete: the bundle renamed
    // to `.ID` with its rootfs directory, beside a healthy bundle.
    let dir = tempfile::tempdir().unwrap();
    let tasks = dir
        .path()
        .join("state/io.containerd.runtime.v2.task/memoh-doc");
    std::fs::create_dir_all(tasks.join(".mcp-broken/rootfs")).unwrap();
    std::fs::write(tasks.join(".mcp-broken/config.json"), "{}").unwrap();
    std::fs::create_dir_all(tasks.join("mcp-fine/rootfs")).unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "namespace = \"memoh-doc\"\ncontainerd_state = {:?}\ncontainerd_socket = {:?}\n",
            dir.path().join("state").display().to_string(),
            dir.path().join("no/containerd.sock").display().to_string(),
        ),
    )
    .unwrap();
    let bundle_line = |text: &str| {
        text.lines()
            .find(|l| l.get(8..).is_some_and(|r| r.starts_with("task bundles ")))
            .unwrap_or_else(|| panic!("no task bundles line:\n{text}"))
            .to_string()
    };
    let (code, text) = doctor(&config);
    assert_ne!(code, 0, "{text}");
    let l = bundle_line(&text);
    assert!(l.starts_with("problem "), "{l}");
    assert!(l.contains("bot(s) broken cannot start"), "{l}");
    assert!(!l.contains("mcp-fine"), "{l}");
    let fix = l.split_once("; fix: ").expect("a fix").1.to_string();
    let out = output_within(
        {
            let mut c = Command::new("sh");
            c.arg("-c").arg(&fix);
            c
        },
        None,
        CLI_LIMIT,
    );
    assert!(out.status.success(), "{fix}: {out:?}");
    assert!(!tasks.join(".mcp-broken").exists());
    assert!(
        tasks.join("mcp-fine").exists(),
        "the fix removed a live bundle"
    );
    let (_, text) = doctor(&config);
    assert!(bundle_line(&text).starts_with("ok "), "{text}");
}

/// `GET /metrics` with `token` (none: the answer's head only, for the refusal).
fn get_metrics(port: u16, token: Option<&str>) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req =
        format!("GET /metrics HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an http response");
    (head.to_string(), body.to_string())
}

/// The metrics, with the agent's MCP token (`/metrics` wants it unless `metrics_public`).
fn scrape(a: &TestAgent, port: u16) -> String {
    let token = a.ok(&["mcp", "token"]).trim().to_string();
    let (head, _) = get_metrics(port, None);
    assert!(
        head.starts_with("HTTP/1.1 401"),
        "metrics without the token: {head}"
    );
    let (head, body) = get_metrics(port, Some(&token));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("text/plain"), "{head}");
    body.to_string()
}

fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in:\n{body}"))
        .parse()
        .unwrap()
}

#[test]
fn metrics_show_bots_and_latencies() {
    let Some(env) = Env::get(false) else { return };
    let (mut a, port) = agent_with_http(&env);
    let before = scrape(&a, port);
    assert_eq!(sample(&before, "memoh_bots{state=\"running\"}"), 0.0);

    let (bot, _) = a.create_bot("m");
    assert_eq!(a.sh_in(&bot, "echo hi").trim(), "hi");
    let body = scrape(&a, port);
    assert_eq!(sample(&body, "memoh_bots{state=\"running\"}"), 1.0);
    assert_eq!(sample(&body, "memoh_bots{state=\"stopped\"}"), 0.0);
    let exec = "memoh_rpc_duration_seconds_count{api=\"proxy\",method=\"Exec\"}";
    assert!(sample(&body, exec) >= 1.0, "{body}");
    let create = "memoh_rpc_duration_seconds_count{api=\"control\",method=\"CreateBot\"}";
    assert_eq!(sample(&body, create), 1.0);
    let inf = "memoh_rpc_duration_seconds_bucket{api=\"proxy\",method=\"Exec\",le=\"+Inf\"}";
    assert_eq!(sample(&body, inf), sample(&body, exec));
    for counter in [
        "memoh_bot_restarts_total",
        "memoh_cni_retries_total",
        "memoh_cni_errors_total",
    ] {
        assert_eq!(sample(&body, counter), 0.0, "{counter}");
    }
    // The stop evicts the pooled channel the exec used.
    a.ok(&["bot", "stop", &bot]);
    let body = scrape(&a, port);
    assert_eq!(sample(&body, "memoh_bots{state=\"running\"}"), 0.0);
    assert!(
        sample(&body, "memoh_pool_evictions_total{reason=\"explicit\"}") >= 1.0,
        "{body}"
    );
}
