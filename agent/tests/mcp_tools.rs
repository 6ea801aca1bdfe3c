//! The MCP tools, the registry, a stdio session and the HTTP endpoint against a real
//! in-process container-server on a temp unix socket (no containerd).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use memoh_agent::mcp::bridge::ToolsServer;
use memoh_agent::mcp::registry::{self, ServerSpec};
use memoh_agent::mcp::stdio::SessionConfig;
use memoh_agent::mcp::{tools, ClientSource, FixedClient, Mcp};
use memoh_agent::AgentError;
use memoh_proto::ContainerClient;
use rmcp::model::JsonObject;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

struct Server {
    dir: TempDir,
    client: ContainerClient,
    stop: CancellationToken,
}

impl Server {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let sock = dir.path().join("s.sock");
        let l = tokio::net::UnixListener::bind(&sock).unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        // Spill files of the process service under the test's own dir, never the host's.
        let mut config = container_server::Config::new(data);
        config.processes.dir = dir.path().join("processes");
        tokio::spawn(async move {
            let _ = container_server::run(
                container_server::Listener::Unix(l),
                config,
                s.cancelled_owned(),
            )
            .await;
        });
        let client = ContainerClient::new(memoh_proto::client::unix_channel(&sock));
        Self { dir, client, stop }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    async fn call(&self, tool: &str, args: Value) -> Result<Value, tools::ToolError> {
        let Value::Object(args) = args else {
            panic!("args")
        };
        tools::call(&self.client, tool, &args).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn write(p: &Path, content: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

#[tokio::test]
async fn read_windows_and_binary_files() {
    let s = Server::start().await;
    write(&s.data().join("a.txt"), b"one\ntwo\nthree\n");
    let r = s
        .call(
            "read",
            json!({"path": "a.txt", "line_offset": 2, "n_lines": 1}),
        )
        .await
        .unwrap();
    assert_eq!(r, json!({"content": "     2\ttwo\n", "total_lines": 3}));
    // `/data/...` is the same file.
    let r2 = s
        .call("read", json!({"path": "/data/a.txt"}))
        .await
        .unwrap();
    assert_eq!(r2["total_lines"], 3);
    write(&s.data().join("bin"), b"\x00\x01\x02");
    let e = s.call("read", json!({"path": "bin"})).await.unwrap_err();
    assert!(e.to_string().contains("only supports text files"), "{e}");
    let e = s
        .call("read", json!({"path": "missing"}))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not found"), "{e}");
    for bad in [
        json!({"path": "a.txt", "line_offset": 0}),
        json!({"path": "a.txt", "n_lines": 201}),
        json!({}),
    ] {
        assert!(matches!(
            s.call("read", bad).await,
            Err(tools::ToolError::InvalidArgument(_))
        ));
    }
}

#[tokio::test]
async fn write_keeps_every_byte() {
    let s = Server::start().await;
    let content = "  leading\n\ttabs  \n\n\ntrailing blank lines\n\n";
    let r = s
        .call(
            "write",
            json!({"path": "/data/sub/w.txt", "content": content}),
        )
        .await
        .unwrap();
    assert_eq!(r, json!({"ok": true}));
    assert_eq!(
        std::fs::read_to_string(s.data().join("sub/w.txt")).unwrap(),
        content
    );
}

#[tokio::test]
async fn list_entries_and_the_cap() {
    let s = Server::start().await;
    write(&s.data().join("d/x.txt"), b"12345");
    std::fs::create_dir_all(s.data().join("d/e")).unwrap();
    let r = s.call("list", json!({"path": "d"})).await.unwrap();
    assert_eq!(r["path"], "/data/d");
    assert_eq!(r["truncated"], false);
    let entries = r["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["path"], "e");
    assert_eq!(entries[0]["is_dir"], true);
    assert_eq!(entries[1]["size"], 5);
    assert_eq!(entries[1]["mode"], "-rw-r--r--");
    assert!(entries[1]["mod_time"].as_str().unwrap().len() >= 20);
    let root = s.call("list", json!({})).await.unwrap();
    assert_eq!(root["path"], "/data");
    let rec = s
        .call("list", json!({"path": "/data/", "recursive": true}))
        .await
        .unwrap();
    assert_eq!(rec["entries"].as_array().unwrap().len(), 3);
    for i in 0..(tools::MAX_LIST_ENTRIES + 5) {
        write(&s.data().join(format!("many/f{i:05}")), b"");
    }
    let r = s.call("list", json!({"path": "many"})).await.unwrap();
    assert_eq!(r["truncated"], true);
    assert_eq!(
        r["entries"].as_array().unwrap().len(),
        tools::MAX_LIST_ENTRIES
    );
}

#[tokio::test]
async fn edit_cases() {
    let s = Server::start().await;
    let f = s.data().join("e.txt");
    // (file, old, new, expected)
    let cases: &[(&[u8], &str, &str, &[u8])] = &[
        (b"a\nb\nc\n", "b\n", "  B  \n\n", b"a\n  B  \n\nc\n"),
        (b"x\r\ny\r\nz\r\n", "x\ny", "1\n2", b"1\r\n2\r\nz\r\n"),
        (
            "\u{feff}head\nbody\n".as_bytes(),
            "body",
            "BODY",
            "\u{feff}head\nBODY\n".as_bytes(),
        ),
        (
            "say \u{201c}hi\u{201d}   \nkeep \u{2014} this  \n".as_bytes(),
            "say \"hi\"\n",
            "said\n",
            "said\nkeep \u{2014} this  \n".as_bytes(),
        ),
    ];
    for (before, old, new, after) in cases {
        std::fs::write(&f, before).unwrap();
        let r = s
            .call(
                "edit",
                json!({"path": "e.txt", "old_text": old, "new_text": new}),
            )
            .await;
        assert_eq!(r.unwrap(), json!({"ok": true}), "old {old:?}");
        assert_eq!(&std::fs::read(&f).unwrap(), after, "old {old:?}");
    }
    std::fs::write(&f, b"dup\ndup\n").unwrap();
    let e = s
        .call(
            "edit",
            json!({"path": "e.txt", "old_text": "dup", "new_text": "x"}),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("matches 2 places"), "{e}");
    assert_eq!(std::fs::read(&f).unwrap(), b"dup\ndup\n");
    let e = s
        .call(
            "edit",
            json!({"path": "e.txt", "old_text": "nope", "new_text": "x"}),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not found"), "{e}");
}

#[tokio::test]
async fn an_edit_that_raced_with_a_write_fails() {
    let s = Server::start().await;
    let f = s.data().join("r.txt");
    std::fs::write(&f, b"value = 1\n").unwrap();
    let f2 = f.clone();
    let e = tools::edit_with_hook(
        &s.client,
        "r.txt",
        "value = 1",
        "value = 2",
        move || async move {
            std::fs::write(&f2, b"value = 1\nother writer\n").unwrap();
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(e, tools::ToolError::Raced(_)), "{e}");
    assert_eq!(
        std::fs::read(&f).unwrap(),
        b"value = 1\nother writer\n",
        "the other write survives"
    );
}

#[tokio::test]
async fn exec_results_and_cut_output() {
    let s = Server::start().await;
    let r = s
        .call("exec", json!({"command": "pwd; echo err >&2; exit 3"}))
        .await
        .unwrap();
    assert_eq!(r["stdout"], format!("{}\n", s.data().display()));
    assert_eq!(r["stderr"], "err\n");
    assert_eq!(r["exit_code"], 3);
    let r = s
        .call("exec", json!({"command": "seq 1 5000"}))
        .await
        .unwrap();
    let out = r["stdout"].as_str().unwrap();
    assert!(
        out.starts_with("1\n2\n") && out.ends_with("4999\n5000\n"),
        "{out}"
    );
    assert!(out.contains("[output cut: "), "{out}");
    let r = s
        .call("exec", json!({"command": "sleep 5", "timeout_seconds": 1}))
        .await
        .unwrap();
    assert_eq!(r["exit_code"], -1);
    std::fs::create_dir_all(s.data().join("w")).unwrap();
    let r = s
        .call("exec", json!({"command": "pwd", "work_dir": "/data/w"}))
        .await
        .unwrap();
    assert_eq!(r["stdout"], format!("{}\n", s.data().join("w").display()));
}

#[tokio::test]
async fn background_processes_through_the_tools() {
    let s = Server::start().await;
    // A server-like process: one line, then waits; a second line on stderr; split UTF-8 later.
    let r = s
        .call(
            "exec",
            json!({"command": "echo ready; echo warm >&2; printf '\\342\\202'; sleep 0.3; printf '\\254!\\n'; sleep 300", "background": true, "tag": "srv"}),
        )
        .await
        .unwrap();
    let id = r["id"].as_str().unwrap().to_string();
    assert!(r["pid"].as_i64().unwrap() > 0, "{r}");
    assert_eq!(r.as_object().unwrap().len(), 2, "{r}");

    let mut text = String::new();
    let mut offset = 0u64;
    let start = std::time::Instant::now();
    while !text.contains('!') {
        assert!(start.elapsed() < Duration::from_secs(10), "{text:?}");
        let o = s
            .call("process_output", json!({"id": id, "offset": offset}))
            .await
            .unwrap();
        assert_eq!(o["running"], true, "{o}");
        assert_eq!(o["state"], "running");
        assert!(
            o.get("exit_code").is_none() && o.get("lost").is_none(),
            "{o}"
        );
        let chunk = o["stdout"].as_str().unwrap();
        // Never half a character: the split euro sign waits for its last byte.
        assert!(!chunk.contains('\u{fffd}'), "{o}");
        assert_eq!(o["next_offset"], offset + chunk.len() as u64, "{o}");
        text.push_str(chunk);
        offset = o["next_offset"].as_u64().unwrap();
        if o["stderr"] != "" {
            assert_eq!(o["stderr"], "warm\n");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(text, "ready\n€!\n");

    let l = s.call("process_list", json!({"tag": "srv"})).await.unwrap();
    let procs = l["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 1, "{l}");
    assert_eq!(procs[0]["id"], id.as_str());
    assert_eq!(procs[0]["state"], "running");
    let none = s
        .call("process_list", json!({"tag": "other"}))
        .await
        .unwrap();
    assert_eq!(none["processes"], json!([]));

    let w = s
        .call("process_wait", json!({"id": id, "timeout_seconds": 0}))
        .await
        .unwrap();
    assert_eq!(w["exited"], false, "{w}");
    assert_eq!(w["summary"], "still running after 0 s");
    let k = s
        .call("process_signal", json!({"id": id, "signal": "SIGTERM"}))
        .await
        .unwrap();
    assert_eq!(
        k,
        json!({"ok": true, "signal": 15, "signal_name": "SIGTERM"})
    );
    let w = s
        .call("process_wait", json!({"id": id, "timeout_seconds": 10}))
        .await
        .unwrap();
    assert_eq!(w["exited"], true, "{w}");
    assert_eq!(w["state"], "signaled");
    assert_eq!(w["exit_code"], 143);
    assert_eq!(w["signal"], 15);
    assert_eq!(w["summary"], "killed by signal 15 (SIGTERM)");
    assert!(w["max_rss_bytes"].as_u64().unwrap() > 0, "{w}");

    // Read to the end in small steps: nothing twice, then the exit code.
    let (mut again, mut again_err) = (String::new(), String::new());
    let (mut at, mut at_err) = (0u64, 0u64);
    for _ in 0..100 {
        let o = s
            .call(
                "process_output",
                json!({"id": id, "offset": at, "stderr_offset": at_err, "max_bytes": 4}),
            )
            .await
            .unwrap();
        again.push_str(o["stdout"].as_str().unwrap());
        again_err.push_str(o["stderr"].as_str().unwrap());
        at = o["next_offset"].as_u64().unwrap();
        at_err = o["next_stderr_offset"].as_u64().unwrap();
        if o["more"] == false {
            assert_eq!(o["exit_code"], 143, "{o}");
            assert_eq!(o["running"], false);
            break;
        }
    }
    assert_eq!(
        (again.as_str(), again_err.as_str()),
        (text.as_str(), "warm\n")
    );

    // A quick command with an exit code.
    let r = s
        .call("exec", json!({"command": "exit 3", "background": true}))
        .await
        .unwrap();
    let w = s
        .call(
            "process_wait",
            json!({"id": r["id"], "timeout_seconds": 10}),
        )
        .await
        .unwrap();
    assert_eq!(
        (w["exit_code"].clone(), w["signal"].clone()),
        (json!(3), json!(null))
    );
    assert_eq!(w["summary"], "exited with code 3");

    // Bad input: tool errors with clear text.
    for (tool, args, want) in [
        ("process_output", json!({"id": "000000000000"}), "not found"),
        ("process_output", json!({"id": "nope"}), "malformed"),
        (
            "process_signal",
            json!({"id": id, "signal": "BOGUS"}),
            "unknown signal",
        ),
        (
            "process_signal",
            json!({"id": id, "signal": 99}),
            "number from 1 to 64",
        ),
        ("process_wait", json!({}), "id is required"),
        (
            "process_output",
            json!({"id": id, "offset": -1}),
            "must not be negative",
        ),
        (
            "exec",
            json!({"command": "true", "tag": "x"}),
            "only for background",
        ),
    ] {
        let e = s.call(tool, args.clone()).await.unwrap_err().to_string();
        assert!(e.contains(want), "{tool} {args}: {e}");
    }
}

/// The last 300 bytes of a long result, for failure messages.
fn tail_of(t: &str) -> &str {
    let mut i = t.len().saturating_sub(300);
    while !t.is_char_boundary(i) {
        i += 1;
    }
    &t[i..]
}

/// The process's peak resident set, from `/proc/self/status`, in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[tokio::test]
async fn exec_output_past_the_bound_is_dropped_while_it_streams() {
    let s = Server::start().await;
    let before = peak_rss();
    // 50 MB of stdout and 3 MB of stderr.
    let r = s
        .call(
            "exec",
            json!({"command": "head -c 50000000 /dev/zero | tr '\\0' y; echo; echo the-end; \
                   head -c 3000000 /dev/zero | tr '\\0' e >&2"}),
        )
        .await
        .unwrap();
    let grown = peak_rss().saturating_sub(before);
    assert_eq!(r["exit_code"], 0);
    let out = r["stdout"].as_str().unwrap();
    let dropped = 50_000_000 + 9 - tools::EXEC_STDOUT_LIMIT;
    assert!(
        out.starts_with("yyyy") && out.ends_with("\nthe-end\n"),
        "{}",
        tail_of(out)
    );
    assert!(
        out.contains(&format!(
            "output cut at 1 MiB while the command ran; {dropped} bytes more not shown"
        )),
        "{}",
        tail_of(out)
    );
    assert!(out.len() <= tools::MAX_OUTPUT_BYTES + 300, "{}", out.len());
    let err = r["stderr"].as_str().unwrap();
    assert!(
        err.contains("output cut at 256 KiB while the command ran"),
        "{}",
        tail_of(err)
    );
    // The agent's memory did not follow the output (the whole of it would be 50 MB).
    assert!(grown < 24 << 20, "peak memory grew by {grown} bytes");
}

struct Down;

#[async_trait::async_trait]
impl ClientSource for Down {
    async fn client(&self, bot: &str) -> Result<ContainerClient, AgentError> {
        Err(AgentError::BotUnavailable {
            bot: bot.into(),
            reason: "task is stopped".into(),
        })
    }
}

#[tokio::test]
async fn an_unreachable_bot_is_a_tool_error() {
    let t = ToolsServer::new(Arc::new(Down), "b1");
    let r = t.run("read", &JsonObject::new()).await;
    assert_eq!(r.is_error, Some(true));
    let text = serde_json::to_value(&r.content).unwrap().to_string();
    assert!(
        text.contains("unreachable") && text.contains("task is stopped"),
        "{text}"
    );
}

fn fixture() -> PathBuf {
    let dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let bin = dir.join("mcp-fixture");
    if !bin.exists() {
        let st = std::process::Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "mcp-fixture"])
            .status()
            .unwrap();
        assert!(st.success());
    }
    bin
}

#[tokio::test]
async fn registry_round_trip() {
    let s = Server::start().await;
    assert!(registry::load(&s.client, "b").await.unwrap().is_empty());
    let spec = ServerSpec {
        name: "fx".into(),
        command: vec!["x".into()],
        env: vec!["A=1".into()],
        cwd: None,
    };
    assert!(!registry::add(&s.client, "b", spec.clone()).await.unwrap());
    assert!(registry::add(&s.client, "b", spec.clone()).await.unwrap());
    assert!(s.data().join(".memoh/mcp.json").exists());
    assert_eq!(registry::load(&s.client, "b").await.unwrap(), vec![spec]);
    registry::remove(&s.client, "b", "fx").await.unwrap();
    assert!(registry::remove(&s.client, "b", "fx").await.is_err());
}

/// One HTTP/1.1 request on a fresh connection; returns (status, headers, body).
async fn http(
    addr: &str,
    path: &str,
    session: Option<&str>,
    token: Option<&str>,
    body: Value,
) -> (u16, String, String) {
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.to_string();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(s) = session {
        req.push_str(&format!(
            "Mcp-Session-Id: {s}\r\nMcp-Protocol-Version: 2025-06-18\r\n"
        ));
    }
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    c.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

/// The status of `REQUEST_LINE` with `headers` (each ending in CRLF) and no body.
async fn raw_status(addr: &str, request_line: &str, headers: &str) -> u16 {
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{request_line} HTTP/1.1\r\n{headers}Content-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\nContent-Length: 2\r\n\
         Connection: close\r\n\r\n{{}}"
    );
    c.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The first JSON-RPC message with an `id` in an SSE or JSON body.
fn rpc(body: &str) -> Value {
    for l in body.lines() {
        let l = l
            .trim()
            .strip_prefix("data:")
            .map(str::trim)
            .unwrap_or(l.trim());
        if let Ok(v) = serde_json::from_str::<Value>(l) {
            if v.get("id").is_some() {
                return v;
            }
        }
    }
    panic!("no json-rpc answer in {body:?}");
}

fn session_id(head: &str) -> String {
    head.lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("mcp-session-id:")
                .then(|| l[15..].trim().to_string())
        })
        .expect("session id")
}

async fn mcp_session(addr: &str, path: &str, token: Option<&str>) -> String {
    let init = json!({"jsonrpc": "2.0", "id": "init-1", "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}});
    let (st, head, body) = http(addr, path, None, token, init).await;
    assert_eq!(st, 200, "{head}\n{body}");
    assert_eq!(rpc(&body)["id"], "init-1");
    let sid = session_id(&head);
    let (st, _, _) = http(
        addr,
        path,
        Some(&sid),
        token,
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await;
    assert_eq!(st, 202);
    sid
}

#[tokio::test]
async fn http_tools_and_stdio_server_end_to_end() {
    let s = Server::start().await;
    write(&s.data().join("hello.txt"), b"hi\n");
    let stop = CancellationToken::new();
    let cfg = SessionConfig {
        idle: Duration::from_secs(60),
        backoff_min: Duration::from_millis(50),
        ..Default::default()
    };
    let mcp = Arc::new(Mcp::new(
        Arc::new(FixedClient(s.client.clone())),
        cfg,
        stop.clone(),
    ));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let access = memoh_agent::mcp::access::Access::new("tok", &addr, &[], false);
    let _task = memoh_agent::mcp::serve_on(mcp.clone(), l, access, stop.clone());

    // Token required.
    let (st, _, _) = http(&addr, "/bots/b1/mcp", None, None, json!({})).await;
    assert_eq!(st, 401);
    // A foreign Host or Origin (DNS rebinding) is refused before the token is looked at.
    for extra in [
        "Host: evil.example\r\nAuthorization: Bearer tok\r\n",
        "Host: localhost\r\nOrigin: http://evil.example\r\nAuthorization: Bearer tok\r\n",
        "Host: localhost\r\nOrigin: null\r\nAuthorization: Bearer tok\r\n",
    ] {
        assert_eq!(
            raw_status(&addr, "POST /bots/b1/mcp", extra).await,
            403,
            "{extra}"
        );
    }
    // /metrics wants the token too.
    assert_eq!(
        raw_status(&addr, "GET /metrics", "Host: localhost\r\n").await,
        401
    );
    let with_token = "Host: localhost\r\nAuthorization: Bearer tok\r\n";
    assert_eq!(raw_status(&addr, "GET /metrics", with_token).await, 200);
    let tok = Some("tok");

    let sid = mcp_session(&addr, "/bots/b1/mcp", tok).await;
    let (_, _, body) = http(
        &addr,
        "/bots/b1/mcp",
        Some(&sid),
        tok,
        json!({"jsonrpc": "2.0", "id": 7, "method": "tools/list"}),
    )
    .await;
    let names: Vec<String> = rpc(&body)["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "read",
            "write",
            "list",
            "edit",
            "exec",
            "process_output",
            "process_list",
            "process_signal",
            "process_wait"
        ]
    );
    let call = json!({"jsonrpc": "2.0", "id": "c1", "method": "tools/call", "params": {"name": "read", "arguments": {"path": "hello.txt"}}});
    let (_, _, body) = http(&addr, "/bots/b1/mcp", Some(&sid), tok, call).await;
    let r = rpc(&body);
    assert_eq!(r["id"], "c1");
    assert_eq!(
        r["result"]["structuredContent"],
        json!({"content": "     1\thi\n", "total_lines": 1})
    );
    let call = json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "read", "arguments": {"path": "nope"}}});
    let (_, _, body) = http(&addr, "/bots/b1/mcp", Some(&sid), tok, call).await;
    assert_eq!(rpc(&body)["result"]["isError"], true);

    // A stdio server registered in the bot, run through Exec.
    let fx = fixture();
    let spec = ServerSpec {
        name: "fx".into(),
        command: vec![fx.display().to_string()],
        env: vec!["FIXTURE_MARK=yes".into()],
        cwd: None,
    };
    mcp.add("b1", spec).await.unwrap();
    let (st, _, _) = http(&addr, "/bots/b1/mcp/unknown", None, tok, json!({})).await;
    assert_eq!(st, 404);
    let sid = mcp_session(&addr, "/bots/b1/mcp/fx", tok).await;
    let (_, _, body) = http(
        &addr,
        "/bots/b1/mcp/fx",
        Some(&sid),
        tok,
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
    )
    .await;
    assert_eq!(rpc(&body)["result"]["tools"][0]["name"], "echo");
    let echo = json!({"jsonrpc": "2.0", "id": "same-id", "method": "tools/call", "params": {"name": "echo", "arguments": {"text": " spaced \n"}}});
    let (_, _, body) = http(&addr, "/bots/b1/mcp/fx", Some(&sid), tok, echo).await;
    let r = rpc(&body);
    assert_eq!(r["id"], "same-id");
    assert_eq!(r["result"]["content"][0]["text"], " spaced \n");
    let env = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "env", "arguments": {"name": "FIXTURE_MARK"}}});
    let (_, _, body) = http(&addr, "/bots/b1/mcp/fx", Some(&sid), tok, env).await;
    assert_eq!(rpc(&body)["result"]["content"][0]["text"], "yes");
    let bad = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "nope", "arguments": {}}});
    let (_, _, body) = http(&addr, "/bots/b1/mcp/fx", Some(&sid), tok, bad).await;
    assert_eq!(rpc(&body)["error"]["code"], -32602);

    // Kill the server process: the session restarts it and the same HTTP session works.
    let pid = json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "pid", "arguments": {}}});
    let (_, _, body) = http(&addr, "/bots/b1/mcp/fx", Some(&sid), tok, pid.clone()).await;
    let pid1: i32 = rpc(&body)["result"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid1),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let session = mcp.session("b1", "fx").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while session.status().starts < 2 || !session.status().running {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("restarted");
    let (_, _, body) = http(&addr, "/bots/b1/mcp/fx", Some(&sid), tok, pid).await;
    let pid2: i32 = rpc(&body)["result"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(pid1, pid2);
    let logs = mcp.logs("b1", "fx").await.unwrap();
    assert!(logs.contains("mcp-fixture started pid"), "{logs}");
    assert!(logs.contains("restarting"), "{logs}");
    let ls = mcp.list("b1").await.unwrap();
    assert_eq!(ls.len(), 1);
    mcp.remove("b1", "fx").await.unwrap();
    stop.cancel();
}
