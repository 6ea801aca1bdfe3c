//! The session state machine against a scripted stdio peer.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::*;

/// A fake MCP server. Methods: `initialize` (fails while `fail_inits` > 0), `echo`, `slow`
/// (never answers), `die` (stderr then exit 3), `ask` (asks the client `roots/list` and returns
/// its answer).
#[derive(Default)]
struct Script {
    launches: AtomicUsize,
    fail_inits: AtomicU32,
    seen: Mutex<Vec<Value>>,
}

impl Script {
    fn seen(&self) -> Vec<Value> {
        self.seen.lock().unwrap().clone()
    }
    fn methods(&self) -> Vec<String> {
        self.seen()
            .iter()
            .filter_map(|m| m.get("method").and_then(Value::as_str).map(String::from))
            .collect()
    }
}

struct ScriptLauncher(Arc<Script>);

fn line(v: Value) -> Output {
    let mut b = serde_json::to_vec(&v).unwrap();
    b.push(b'\n');
    Output::Stdout(Bytes::from(b))
}

#[async_trait::async_trait]
impl Launcher for ScriptLauncher {
    async fn launch(&self) -> Result<Pipe, String> {
        let script = self.0.clone();
        script.launches.fetch_add(1, Ordering::SeqCst);
        let (stdin_tx, mut stdin_rx) = mpsc::channel::<Bytes>(64);
        let (out_tx, out_rx) = mpsc::channel(64);
        let task = tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut waiting_ask: Option<Value> = None;
            while let Some(chunk) = stdin_rx.recv().await {
                buf.extend_from_slice(&chunk);
                while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                    let l: Vec<u8> = buf.drain(..=nl).collect();
                    let msg: Value = serde_json::from_slice(&l).unwrap();
                    script.seen.lock().unwrap().push(msg.clone());
                    let id = msg.get("id").cloned();
                    let method = msg.get("method").and_then(Value::as_str).unwrap_or("");
                    // An answer to our own `ask` request.
                    if method.is_empty() {
                        if let Some(orig) = waiting_ask.take() {
                            let r = msg.get("result").cloned().unwrap_or(Value::Null);
                            let _ = out_tx
                                .send(line(json!({"jsonrpc":"2.0","id":orig,"result":{"got":r}})))
                                .await;
                        }
                        continue;
                    }
                    let Some(id) = id else { continue };
                    let reply = match method {
                        "initialize" => {
                            if script.fail_inits.load(Ordering::SeqCst) > 0 {
                                script.fail_inits.fetch_sub(1, Ordering::SeqCst);
                                json!({"jsonrpc":"2.0","id":id,"error":{"code":-32000,"message":"not ready","data":{"why":"warming up"}}})
                            } else {
                                json!({"jsonrpc":"2.0","id":id,"result":{"protocolVersion":"2025-06-18","capabilities":{"tools":{}},"serverInfo":{"name":"fake","version":"1"}}})
                            }
                        }
                        "echo" => {
                            json!({"jsonrpc":"2.0","id":id,"result":msg.get("params").cloned().unwrap_or(Value::Null)})
                        }
                        "fail" => {
                            json!({"jsonrpc":"2.0","id":id,"error":{"code":-32602,"message":"bad","data":[1,2]}})
                        }
                        "slow" => continue,
                        "die" => {
                            let _ = out_tx
                                .send(Output::Stderr(Bytes::from_static(b"boom: dying\n")))
                                .await;
                            let _ = out_tx.send(Output::Exit(3)).await;
                            return;
                        }
                        "ask" => {
                            waiting_ask = Some(id);
                            json!({"jsonrpc":"2.0","id":"srv-1","method":"roots/list"})
                        }
                        _ => {
                            json!({"jsonrpc":"2.0","id":id,"error":{"code":-32601,"message":"no such method"}})
                        }
                    };
                    if out_tx.send(line(reply)).await.is_err() {
                        return;
                    }
                }
            }
        });
        struct Abort(tokio::task::JoinHandle<()>);
        impl Drop for Abort {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        Ok(Pipe {
            stdin: stdin_tx,
            output: out_rx,
            guard: Box::new(Abort(task)),
        })
    }
}

fn session(script: &Arc<Script>, idle: Duration) -> Session {
    Session::new(
        "fake",
        Arc::new(ScriptLauncher(script.clone())),
        SessionConfig {
            idle,
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(100),
            healthy_after: Duration::from_secs(30),
        },
    )
}

fn init_params(name: &str) -> Option<Value> {
    Some(
        json!({"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":name,"version":"0"}}),
    )
}

#[tokio::test]
async fn client_initialize_is_forwarded_once() {
    let script = Arc::new(Script::default());
    let s = session(&script, Duration::from_secs(60));
    let ct = CancellationToken::new();
    let (a, b) = (s.new_client(), s.new_client());
    let r1 = s
        .call(a, "initialize", init_params("a"), &ct)
        .await
        .unwrap();
    s.notify("notifications/initialized", None).await;
    let r2 = s
        .call(b, "initialize", init_params("b"), &ct)
        .await
        .unwrap();
    assert_eq!(r1, r2);
    assert_eq!(r1["serverInfo"]["name"], "fake");
    let echoed = s.call(a, "echo", Some(json!({"x": 1})), &ct).await.unwrap();
    assert_eq!(echoed, json!({"x": 1}));
    let m = script.methods();
    assert_eq!(
        m,
        vec!["initialize", "notifications/initialized", "echo"],
        "{:?}",
        script.seen()
    );
    // The client's own initialize went through: its clientInfo reached the server.
    assert_eq!(script.seen()[0]["params"]["clientInfo"]["name"], "a");
}

#[tokio::test]
async fn call_before_initialize_shakes_hands_once() {
    let script = Arc::new(Script::default());
    let s = session(&script, Duration::from_secs(60));
    let ct = CancellationToken::new();
    let (r1, r2) = tokio::join!(
        s.call(1, "echo", Some(json!(1)), &ct),
        s.call(2, "echo", Some(json!(2)), &ct)
    );
    assert_eq!((r1.unwrap(), r2.unwrap()), (json!(1), json!(2)));
    let m = script.methods();
    assert_eq!(m.iter().filter(|m| *m == "initialize").count(), 1, "{m:?}");
    assert_eq!(m[0], "initialize");
    assert_eq!(m[1], "notifications/initialized");
    assert_eq!(
        script.seen()[0]["params"]["clientInfo"]["name"],
        "memoh-agent"
    );
    // Ids the agent used are all distinct.
    let ids: Vec<_> = script
        .seen()
        .iter()
        .filter_map(|v| v.get("id").cloned())
        .collect();
    let mut uniq = ids.clone();
    uniq.dedup();
    assert_eq!(ids.len(), uniq.len());
}

#[tokio::test]
async fn failed_handshake_is_retried_on_the_next_call() {
    let script = Arc::new(Script::default());
    script.fail_inits.store(1, Ordering::SeqCst);
    let s = session(&script, Duration::from_secs(60));
    let ct = CancellationToken::new();
    let e = s.call(1, "echo", Some(json!("x")), &ct).await.unwrap_err();
    assert!(matches!(e, CallError::Handshake { .. }), "{e:?}");
    assert!(e.to_string().contains("not ready"), "{e}");
    assert_eq!(
        s.call(1, "echo", Some(json!("y")), &ct).await.unwrap(),
        json!("y")
    );
    assert_eq!(
        script
            .methods()
            .iter()
            .filter(|m| *m == "initialize")
            .count(),
        2
    );
    assert_eq!(
        script.launches.load(Ordering::SeqCst),
        1,
        "the process was kept"
    );
}

#[tokio::test]
async fn client_initialize_failure_is_passed_through_and_retried() {
    let script = Arc::new(Script::default());
    script.fail_inits.store(1, Ordering::SeqCst);
    let s = session(&script, Duration::from_secs(60));
    let ct = CancellationToken::new();
    let e = s
        .call(1, "initialize", init_params("a"), &ct)
        .await
        .unwrap_err();
    match e {
        CallError::Rpc(r) => {
            assert_eq!(r.code, -32000);
            assert_eq!(r.message, "not ready");
            assert_eq!(r.data, Some(json!({"why": "warming up"})));
        }
        other => panic!("{other:?}"),
    }
    s.call(1, "initialize", init_params("a"), &ct)
        .await
        .unwrap();
}

#[tokio::test]
async fn error_objects_keep_code_message_and_data() {
    let script = Arc::new(Script::default());
    let s = session(&script, Duration::from_secs(60));
    let e = s
        .call(1, "fail", None, &CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(
        e,
        CallError::Rpc(RpcError {
            code: -32602,
            message: "bad".into(),
            data: Some(json!([1, 2]))
        })
    );
}

#[tokio::test]
async fn cancel_leaves_nothing_pending_and_tells_the_server() {
    let script = Arc::new(Script::default());
    let s = session(&script, Duration::from_secs(60));
    let ct = CancellationToken::new();
    s.call(1, "echo", None, &ct).await.unwrap();
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    let s2 = s.clone();
    let h = tokio::spawn(async move { s2.call(1, "slow", None, &c2).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(s.pending(), 1);
    cancel.cancel();
    let r = tokio::time::timeout(Duration::from_secs(2), h)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.unwrap_err(), CallError::Cancelled);
    assert_eq!(s.pending(), 0);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let seen = script.seen();
    let slow_id = seen.iter().find(|m| m["method"] == "slow").unwrap()["id"].clone();
    let cancelled = seen
        .iter()
        .find(|m| m["method"] == "notifications/cancelled")
        .unwrap();
    assert_eq!(cancelled["params"]["requestId"], slow_id);

    // A dropped call future cleans up too.
    let s3 = s.clone();
    let h = tokio::spawn(async move { s3.call(1, "slow", None, &CancellationToken::new()).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(s.pending(), 1);
    h.abort();
    let _ = h.await;
    assert_eq!(s.pending(), 0);
}

#[tokio::test]
async fn close_fails_calls_promptly_and_the_server_comes_back() {
    let script = Arc::new(Script::default());
    let s = session(&script, Duration::from_secs(60));
    let ct = CancellationToken::new();
    s.call(1, "echo", None, &ct).await.unwrap();
    let s2 = s.clone();
    let slow =
        tokio::spawn(async move { s2.call(1, "slow", None, &CancellationToken::new()).await });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let die = s.call(1, "die", None, &ct).await.unwrap_err();
    assert!(matches!(die, CallError::Closed { .. }), "{die:?}");
    assert!(die.to_string().contains("exited with code 3"), "{die}");
    assert!(die.to_string().contains("boom: dying"), "{die}");
    let slow = tokio::time::timeout(Duration::from_secs(1), slow)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(slow, Err(CallError::Closed { .. })), "{slow:?}");
    assert_eq!(s.pending(), 0);
    // Restarted with backoff, without any call.
    tokio::time::timeout(Duration::from_secs(2), async {
        while script.launches.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    // The new process gets its own handshake.
    assert_eq!(
        s.call(1, "echo", Some(json!(5)), &ct).await.unwrap(),
        json!(5)
    );
    assert_eq!(
        script
            .methods()
            .iter()
            .filter(|m| *m == "initialize")
            .count(),
        2
    );
    assert!(s.logs().contains("boom: dying"));
    assert!(s.logs().contains("restarting"));
    assert_eq!(s.status().starts, 2);
}

#[tokio::test]
async fn idle_sessions_close_and_restart_on_the_next_call() {
    let script = Arc::new(Script::default());
    let s = session(&script, Duration::from_millis(100));
    let ct = CancellationToken::new();
    s.call(1, "echo", None, &ct).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!s.status().running);
    assert_eq!(
        script.launches.load(Ordering::SeqCst),
        1,
        "no restart after an idle close"
    );
    s.call(1, "echo", None, &ct).await.unwrap();
    assert_eq!(script.launches.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn server_requests_reach_the_client_and_answers_go_back() {
    let script = Arc::new(Script::default());
    let s = session(&script, Duration::from_secs(60));
    let ct = CancellationToken::new();
    let me = s.new_client();
    let mut rx = s.subscribe();
    let s2 = s.clone();
    let answerer = tokio::spawn(async move {
        loop {
            if let Ok(ServerMessage::Request {
                generation,
                id,
                method,
                target,
                ..
            }) = rx.recv().await
            {
                assert_eq!(method, "roots/list");
                assert_eq!(target, me);
                s2.respond(generation, id, Ok(json!({"roots": []}))).await;
                return;
            }
        }
    });
    let r = s.call(me, "ask", None, &ct).await.unwrap();
    assert_eq!(r, json!({"got": {"roots": []}}));
    answerer.await.unwrap();
    let answer = script
        .seen()
        .into_iter()
        .find(|m| m["id"] == "srv-1")
        .unwrap();
    assert_eq!(answer["result"], json!({"roots": []}));
}

#[tokio::test]
async fn server_request_without_clients_is_refused() {
    let script = Arc::new(Script::default());
    let s = session(&script, Duration::from_secs(60));
    let ct = CancellationToken::new();
    let r = s.call(1, "ask", None, &ct).await.unwrap();
    assert_eq!(r["got"], Value::Null);
    let answer = script
        .seen()
        .into_iter()
        .find(|m| m["id"] == "srv-1")
        .unwrap();
    assert_eq!(answer["error"]["code"], -32601);
}
